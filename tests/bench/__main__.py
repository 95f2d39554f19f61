"""`python -m tests.bench` (what `make bench` runs)."""

import os
import sys

# The bench forks (h2load, nghttp) after using gRPC for its sanity calls; gRPC's fork handlers only log about it.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from tests.bench.harness import main

sys.exit(main())
