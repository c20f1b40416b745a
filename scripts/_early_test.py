import sys, pytest
from swarm.kernels import triton_decode as td
td.PDL_EARLY = frozenset({"ssm_decode", "gemv", "gemv_residual", "norm_gemv"})
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-m", "gpu", "tests/kernels/test_triton.py", "-k", "graph_decoder or gemv or ssm_decode", "tests/test_oracle.py"]))
