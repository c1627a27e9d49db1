"""Spot checks: run a seeded random share of decoded jobs end to end too and compare the bytes.

A checked job passes when its token ids and text bytes are the end-to-end ones and every stored
embedding it used is bit for bit a fresh encode of its image (a one-ulp change of an embedding
often leaves a short greedy output as it was). The end-to-end path lives in splitvlm.verify,
which imports the decoder; so it comes in here as a callable, and the command line wires the two.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import blake3

from splitvlm.core.errors import SplitVLMError
from splitvlm.decoder.jobs import Job
from splitvlm.decoder.pipeline import Result, first_difference

# (jobs, their store keys) -> (end-to-end results in order, {store key: how it differs from a fresh encode})
EndToEnd = Callable[[list[Job], list[list[str]]], tuple[list[Result], dict[str, str]]]


def chosen(job_id: str, fraction: float, seed: int) -> bool:
    """Whether the spot check takes this job: a draw from blake3(seed, job id), so each job's fate
    is the same in every run and does not depend on the other jobs of the file."""
    if fraction >= 1.0:
        return True
    if fraction <= 0.0:
        return False
    digest = blake3.blake3(f"splitvlm.spot-check/1\0{seed}\0{job_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


@dataclass
class SpotCheckReport:
    fraction: float
    seed: int
    checked: list[str] = field(default_factory=list)
    mismatches: dict[str, str] = field(default_factory=dict)  # job id -> where output or embedding differs
    errors: dict[str, str] = field(default_factory=dict)  # job id -> why it could not run end to end

    @property
    def identical(self) -> int:
        return len(self.checked) - len(self.mismatches) - len(self.errors)

    def summary(self) -> str:
        line = (f"spot check ({self.fraction:g} of the jobs, seed {self.seed}): "
                f"{self.identical}/{len(self.checked)} identical end to end")
        if self.mismatches:
            line += "; MISMATCH: " + ", ".join(f"{job} ({where})" for job, where in self.mismatches.items())
        if self.errors:
            line += "; could not check: " + ", ".join(f"{job} ({why})" for job, why in self.errors.items())
        return line

    def to_json(self) -> dict:
        return {"fraction": self.fraction, "seed": self.seed, "checked": self.checked,
                "identical": self.identical, "mismatches": self.mismatches, "errors": self.errors}


def spot_check(jobs: list[Job], results: list[Result], fraction: float, seed: int,
               end_to_end: EndToEnd) -> SpotCheckReport:
    """Run the chosen jobs that decoded without error end to end; mark their results and report.

    Only the chosen jobs run, in batches of their own rather than the split path's: under the
    exact profile outputs do not depend on the batch (measured on the H200, and checked on the CPU
    by tests/test_batch_invariance.py), so this raises no false alarms. Under the fast profile a
    mismatch may be a batch effect.
    """
    if not 0.0 <= fraction <= 1.0:
        raise SplitVLMError(f"--spot-check {fraction}: give a share of the jobs between 0 and 1")
    report = SpotCheckReport(fraction, seed)
    picks = [i for i, (job, r) in enumerate(zip(jobs, results, strict=True))
             if r.error is None and chosen(job.id, fraction, seed)]
    if not picks:
        return report
    e2e, embeddings = end_to_end([jobs[i] for i in picks], [results[i].keys for i in picks])
    for i, other in zip(picks, e2e, strict=True):
        split = results[i]
        report.checked.append(split.id)
        split.spot_checked = True
        if other.error is not None:
            split.spot_check_identical = False
            split.spot_check_error = other.error
            report.errors[split.id] = other.error
            continue
        diff = first_difference(split.token_ids, other.token_ids)
        problems = [f"{key[:16]}…: {embeddings[key]}" for key in split.keys if key in embeddings]
        if diff is not None:
            problems.insert(0, f"first difference at token {diff}")
        elif split.text.encode() != other.text.encode():
            problems.insert(0, "text bytes differ")
        split.spot_check_identical = not problems
        if problems:
            report.mismatches[split.id] = "; ".join(problems)
    return report
