"""sandboxd: Docker sandboxes for tool-using agents, served over NATS request/reply.

``daemon.run`` serves the API, ``client.SandboxClient`` calls it, ``envhub`` builds environment
images from TOML specs, ``reaper`` removes containers nobody owns any more. ``session`` keeps a
resident shell per session (commands cost a fork, not a ``docker exec``), ``pool`` keeps started
containers ready, ``commands`` decides how each command runs and reports what happened.
"""
