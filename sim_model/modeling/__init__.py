"""The CondInst network's parts: FPN backbones, FCOS head, mask branch and dynamic mask head, the
network that joins them, and the box queries of the SIM engine. Imports detectron2 and torch only."""
