"""sim_model: the box→mask engines (GrabCut cold start, SIM) and the SIM network on detectron2."""
