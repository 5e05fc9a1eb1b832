"""Kubernetes on one machine: the real control plane, a process kubelet, SeaweedFS, Prometheus and the operator."""
