"""edge: the camera-site runtime and the `edge-agent` command line."""
