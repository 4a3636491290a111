"""Admission throughput of the operator on the local control plane (``make bench-admission``)."""
