"""A job's files, staged by its site's agent beneath the site's `files_root` (CONTRACT.md, "Steps and files"):
inputs written or copied in before the first step, the steps' workdirs made and their redirections opened,
outputs copied out to their file:// URLs after the last.

Local and Slurm sites run jobs as the agent's own user, without a container: a path the agent writes or reads
for a job must not lead it elsewhere (to its credentials, say). The contract keeps `..` out of a job's paths and
the policy compares them with the root as strings; here each one is walked from the root's real directory one
name at a time, never following a symlink blindly: one that leads back beneath the root is followed, one that
leads outside is refused. What is opened is what was checked: no process (the job itself, or another tenant's
job beneath the same root) can swap a directory for a symlink between the check and the use. (A step's workdir
is made here but entered by the step itself, as the job's own user: no more than its command may do anyway.)

Blocking: callers run these in a thread (`asyncio.to_thread`) when the files may be large or far (NFS).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import PurePosixPath

from shared.contracts.jobs import JobSpec, Step, beneath, file_url_path

MAX_SYMLINKS = 40  # as the kernel's own limit
READ = os.O_RDONLY | os.O_NONBLOCK  # non-blocking: a FIFO left where a file should be must not hang the agent
WRITE = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK
COPY_CHUNK = 1 << 20


class StagingError(Exception):
    """A file the job needs or leaves could not be staged; the message names the field, the path and why."""


class Outside(OSError):
    """A path leads outside the root (through a symlink)."""


def open_beneath(root: str, path: str, flags: int, make_dirs: bool = False) -> int:
    """Open `path` (absolute, normalised) beneath `root`, walking from the root's real directory one name at a time
    and following a symlink only where it leads beneath the root (its real path or the path it is named by);
    Outside otherwise. `make_dirs`: make the missing directories on the way (and the last name, if a directory
    is asked for). A regular file only (or, with
    O_DIRECTORY, a directory): a FIFO or a device is refused. Returns the descriptor, blocking again."""
    if not beneath(path, root):
        raise Outside(errno.EPERM, f"outside {root}")
    real_root = os.path.realpath(root)
    todo = list(PurePosixPath(path).relative_to(root).parts)
    dirs = [os.open(real_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]  # the real directories walked
    links = 0
    try:
        while todo:
            name = todo.pop(0)
            if name in ("", "."):
                continue
            if name == "..":  # only from a symlink's target: the parent of a real directory walked
                if len(dirs) == 1:
                    raise Outside(errno.EPERM, f"leads outside {root} through a symlink")
                os.close(dirs.pop())
                continue
            last = not todo
            try:
                fd = os.open(name, (flags if last else os.O_RDONLY | os.O_DIRECTORY) | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o666, dir_fd=dirs[-1])
            except FileNotFoundError:
                if not make_dirs or (last and not flags & os.O_DIRECTORY):
                    raise
                with contextlib.suppress(FileExistsError):  # made meanwhile: walk it as it is
                    os.mkdir(name, 0o777, dir_fd=dirs[-1])
                todo.insert(0, name)
                continue
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR) or not _is_symlink(name, dirs[-1]):
                    raise
                links += 1
                if links > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP)) from None
                todo[:0] = _follow(os.readlink(name, dir_fd=dirs[-1]), dirs, root, real_root)
                continue
            if last:
                return _checked(fd, flags)
            dirs.append(fd)
        return _checked(os.dup(dirs[-1]), flags)  # the root itself
    finally:
        for fd in dirs:
            os.close(fd)


def _is_symlink(name: str, dir_fd: int) -> bool:
    return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)


def _follow(target: str, dirs: list[int], root: str, real_root: str) -> list[str]:
    """Where a symlink leads, as names to walk next: from the directory it is in (relative), or from the root
    (absolute, beneath the root's real path or the path it is named by); Outside otherwise."""
    if not target.startswith("/"):
        return target.split("/")
    for top in (real_root, root):
        if beneath(target, top):  # as strings: a `..` in the rest is walked, and may not climb above the root
            for fd in dirs[1:]:
                os.close(fd)
            del dirs[1:]
            return target[len(top.rstrip("/")):].split("/")
    raise Outside(errno.EPERM, f"leads outside {root} through a symlink")


def _checked(fd: int, flags: int) -> int:
    mode = os.fstat(fd).st_mode
    wanted = stat.S_ISDIR if flags & os.O_DIRECTORY else stat.S_ISREG
    if not wanted(mode):
        os.close(fd)
        raise OSError(errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL,
                      "is a directory" if stat.S_ISDIR(mode) else "is not a regular file")
    os.set_blocking(fd, True)
    return fd


def _open(root: str, where: str, path: str, flags: int, make_dirs: bool = False) -> int:
    """open_beneath, its failure a StagingError naming the field and the path."""
    try:
        return open_beneath(root, path, flags, make_dirs)
    except OSError as e:
        raise StagingError(f"{where}: {path}: {e.strerror or e}") from None


def _write(root: str, where: str, path: str) -> int:
    fd = _open(root, where, path, WRITE, make_dirs=True)
    os.ftruncate(fd, 0)  # only once it is known to be a regular file beneath the root
    return fd


def _copy(root: str, source: tuple[str, str], target: tuple[str, str]) -> None:
    """Copy the file at source = (field, path) to target = (field, path), both beneath the root."""
    with open(_open(root, *source, READ), "rb") as src, open(_write(root, *target), "wb") as dst:
        shutil.copyfileobj(src, dst, COPY_CHUNK)


def stage_in(spec: JobSpec, root: str) -> None:
    """Before the first step: each input written (`content`) or copied (from its file:// URL) to its path, each
    step's workdir made, and the directories its stdout and stderr go to. StagingError at the first that fails."""
    for i, f in enumerate(spec.inputs):
        if f.url is not None:
            _copy(root, (f"inputs.{i}.url", file_url_path(f.url)), (f"inputs.{i}.path", f.path))
        else:
            with open(_write(root, f"inputs.{i}.path", f.path), "w", encoding="utf-8") as out:
                out.write(f.content or "")
    for i, step in enumerate(spec.steps):
        if step.workdir is not None:
            os.close(_open(root, f"steps.{i}.workdir", step.workdir, os.O_RDONLY | os.O_DIRECTORY, make_dirs=True))
        for name in ("stdout", "stderr"):
            if (path := getattr(step, name)) is not None and (parent := os.path.dirname(path)) != path:
                os.close(_open(root, f"steps.{i}.{name}", parent, os.O_RDONLY | os.O_DIRECTORY, make_dirs=True))


@contextlib.contextmanager
def step_files(step: Step, i: int, root: str | None) -> Iterator[tuple[int | None, int | None, int | None]]:
    """The descriptors of a step's stdin, stdout and stderr (None where it names none), open while in the block;
    one file for both when stdout and stderr are the same. StagingError if one cannot be opened."""
    if root is None:
        yield None, None, None
        return
    with contextlib.ExitStack() as opened:
        def keep(fd: int) -> int:
            opened.callback(os.close, fd)
            return fd
        stdin = keep(_open(root, f"steps.{i}.stdin", step.stdin, READ)) if step.stdin else None
        stdout = keep(_write(root, f"steps.{i}.stdout", step.stdout)) if step.stdout else None
        stderr = stdout if step.stderr is not None and step.stderr == step.stdout else (
            keep(_write(root, f"steps.{i}.stderr", step.stderr)) if step.stderr else None)
        yield stdin, stdout, stderr


def stage_out(spec: JobSpec, root: str) -> list[str]:
    """After the last step: each output copied from its path to its file:// URL. What could not be, each naming
    the field, the path and why (a file the job did not leave, say)."""
    problems = []
    for i, f in enumerate(spec.outputs):
        try:
            _copy(root, (f"outputs.{i}.path", f.path), (f"outputs.{i}.url", file_url_path(f.url)))
        except StagingError as e:
            problems.append(str(e))
    return problems
