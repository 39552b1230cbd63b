"""The supervisor daemon and its parts: the daemon's event loop (daemon.py), the kernel process
(kernelproc.py), driver processes (driverproc.py), their supervision policy (supervision.py) and
runtime (drivermgr.py), hot swaps (hotswap.py), console drivers' output (consolerelay.py) and
injected faults (faulttable.py).

Nothing here imports the CLI (isovisor/cli/), which sits above it (tests/test_lint.py checks).
"""
