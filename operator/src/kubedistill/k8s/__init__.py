"""The only package that talks to the API server (client, resources) or reads stage outputs (observe)."""
