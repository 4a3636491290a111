"""Example workloads for Koinon AIJobs (run as Ray job drivers on volunteer nodes)."""
