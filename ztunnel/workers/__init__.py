"""Worker processes: one agent serving from every CPU it may use (`ztunnel run --workers N`).

Rooms: `plan` (pure: how many workers, how they share the listeners, their settings, restart
backoff; reading the CPU affinity and cgroup quota), `channel` (the control channel's framing,
sans-I/O, and its asyncio end), `metrics` (merging the workers' metric families into one
/metrics), `supervisor` (the agent's side: listener groups, starting, feeding, restarting and
draining workers), `child` (a worker process).
"""
