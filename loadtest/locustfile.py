"""The Locust entry point: the users live in loadtest/users.py (run by ./loadtest/run.sh, which builds
the plan and starts the servers; see loadtest/serve.py).

Locust runs as its own process: imported beside torch it fails (gevent monkey-patching), so nothing
this file imports may import torch. The repository root must be on PYTHONPATH (run.sh sets it).
"""

from loadtest.users import AdminUser, ChatUser, ClassifyUser, CompletionUser, VersionProbeUser

__all__ = ["AdminUser", "ChatUser", "ClassifyUser", "CompletionUser", "VersionProbeUser"]
