"""Deployment surfaces: the cluster launcher config, Ray job submission, Serve config files."""
