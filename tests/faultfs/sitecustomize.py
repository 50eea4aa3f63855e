"""A disk that fills up, for tests where no small filesystem can be mounted (tests/test_build_faults.py).

Put this folder on PYTHONPATH and set ``MDV2_TEST_DISK=<folder>:<bytes>``: every Python process of the job
(the build driver, Ray's workers: they inherit the environment) then sees files opened for writing under
<folder> fail with a real ``OSError(ENOSPC)`` from ``write`` once the files there would hold more than
<bytes>. Only the OS boundary is replaced (builtins.open); the code under test runs unchanged.
"""
import builtins
import errno
import os

_spec = os.environ.get("MDV2_TEST_DISK")
if _spec:
    _root, _budget = _spec.rsplit(":", 1)
    _root, _budget = os.path.abspath(_root), int(_budget)
    _open = builtins.open

    def _used() -> int:
        total = 0
        for folder, _, files in os.walk(_root):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(folder, f))
                except OSError:
                    pass
        return total

    class _Full:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            if _used() + len(data) > _budget:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self._f.write(data)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def __iter__(self):
            return iter(self._f)

    def _limited_open(file, mode="r", *args, **kwargs):
        f = _open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax+") and isinstance(file, (str, bytes, os.PathLike)) and \
                os.path.abspath(os.fsdecode(file)).startswith(_root + os.sep):
            return _Full(f)
        return f

    builtins.open = _limited_open
