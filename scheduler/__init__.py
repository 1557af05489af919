"""Node scheduler: runs and supervises the replicas the controller assigns to its node."""
