"""The teacher budget while generate runs: a prompt starts only while what is spent, what is in flight
and its own worst case stay within `budget.maxTeacherCostUSD`."""

from __future__ import annotations

from kubedistill.api.models import GenerationSpec
from kubedistill.catalog import ResolvedTeacher


class BudgetGate:
    """Admits a prompt only while spent + in-flight projections + its projection fit the budget."""

    def __init__(self, limit: float | None, spent: float, worst_case: float) -> None:
        self.limit = limit
        self.spent = spent
        self.in_flight = 0.0
        self.worst_case = worst_case
        self._answered = 0
        self._answered_cost = 0.0

    def projection(self) -> float:
        # Before any answer the worst case (maxTokens); then twice the mean seen so far.
        if not self._answered:
            return self.worst_case
        return min(self.worst_case, 2 * self._answered_cost / self._answered)

    def admit(self) -> float | None:
        projected = self.projection()
        if self.limit is not None and self.spent + self.in_flight + projected > self.limit:
            return None
        self.in_flight += projected
        return projected

    def settle(self, projected: float, cost: float | None) -> None:
        self.in_flight -= projected
        if cost is not None:
            self.spent += cost
            self._answered += 1
            self._answered_cost += cost

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.spent + self.projection() > self.limit


def worst_case_cost(teacher: ResolvedTeacher, longest_request_tokens: int, gen: GenerationSpec) -> float:
    """The most one prompt can cost: the longest prompt, billed per request, and maxTokens per sample."""
    requests = 1 if teacher.supports_n else gen.n_samples
    return teacher.cost(longest_request_tokens * requests, gen.max_tokens * gen.n_samples)
