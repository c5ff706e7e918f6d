"""Web demo for an MGM Triton server: `mgm-web` (client.web.server)."""
