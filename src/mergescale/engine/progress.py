"""The merge engines' progress display: a rich bar over bytes read, with tensors done and GB/s; or a callback."""

from __future__ import annotations

from collections.abc import Callable


class MergeProgress:
    """A rich progress bar over bytes read, with tensors done and GB/s; or a callback; or nothing."""

    def __init__(
        self, progress: bool | Callable[[int, int], None], total_bytes: int, total_tensors: int
    ) -> None:
        self.callback = progress if callable(progress) else None
        self.total = total_bytes
        self.total_tensors = total_tensors
        self.done_bytes = 0
        self.done_tensors = 0
        self.bar = None
        if progress is True:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn

            self.bar = Progress(
                TextColumn("[bold]merging[/] {task.fields[tensors]}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TransferSpeedColumn(),
                TimeElapsedColumn(),
                transient=False,
            )
            self.task = self.bar.add_task("merge", total=total_bytes, tensors=f"0/{total_tensors} tensors")

    def __enter__(self) -> MergeProgress:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def advance(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        if self.bar is not None:
            self.bar.update(self.task, advance=nbytes)
        elif self.callback is not None:
            self.callback(self.done_bytes, self.total)

    def tensor_done(self) -> None:
        self.done_tensors += 1
        if self.bar is not None:
            self.bar.update(self.task, tensors=f"{self.done_tensors}/{self.total_tensors} tensors")
