"""The verification report: one row per check, the quality figures, and a verdict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# A check's status. WARN: the check ran but had nothing to compare against; it does not fail the report.
PASS, FAIL, SKIP, WARN = "pass", "fail", "skip", "warn"



@dataclass
class CheckResult:
    """One check: its status (pass, fail, skip), a one-line message and the figures behind it."""

    name: str
    status: str
    message: str
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class VerifyReport:
    gguf: str
    ref: str | None
    quant_type: str | None
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.status != FAIL for check in self.checks)

    def check(self, name: str) -> CheckResult:
        return next(c for c in self.checks if c.name == name)

    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status == FAIL]

    def to_dict(self) -> dict:
        """Plain JSON-able form, for the manifest."""
        return {
            "gguf": self.gguf, "ref": self.ref, "quant_type": self.quant_type, "passed": self.passed,
            "checks": [asdict(c) for c in self.checks],
        }

    def table(self) -> str:
        """The report as a text table: one row per check, then the quality figures per language."""
        rows = [("check", "result", "details")] + [(c.name, c.status.upper(), c.message) for c in self.checks]
        width = [max(len(r[i]) for r in rows) for i in range(2)]
        lines = [f"{r[0]:<{width[0]}}  {r[1]:<{width[1]}}  {r[2]}" for r in rows]
        lines.insert(1, "-" * (width[0] + width[1] + 4 + max(len(r[2]) for r in rows)))
        quality = next((c for c in self.checks if c.name == "quality" and c.figures.get("languages")), None)
        if quality:
            lines += ["", "lang  positions  mean KLD   same top  PPL ref     PPL gguf    PPL ratio"]
            for lang, f in quality.figures["languages"].items():
                lines.append(
                    f"{lang:<4}  {f['positions']:>9}  {f['kld_mean']:<9.5f}  {f['same_top']:>7.1%}  "
                    f"{f['ppl_ref']:<10.4g}  {f['ppl_gguf']:<10.4g}  {f['ppl_ratio']:.4f}"
                )
        verdict = "PASSED" if self.passed else "FAILED: " + ", ".join(c.name for c in self.failures())
        return "\n".join(lines + ["", f"verify {verdict}"])

