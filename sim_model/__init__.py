"""sim_model: the SIM network on detectron2, the box→mask engines (GrabCut cold start, SIM), evaluation, and the
model versions on disk (registry). The ground floor: it imports neither sim_backend nor training."""
