from .host_memory import reexec_with_resident_heap

reexec_with_resident_heap()  # before JAX loads: see host_memory.py
from .cli import main  # noqa: E402

main()
