"""One-machine stand-in for Kubernetes: API server emulator, process kubelet, SeaweedFS and Prometheus."""
