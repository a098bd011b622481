"""The document's extraction time limit, shared by the page tasks of one document."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from vramflow.extraction_budget import ExtractionBudget


def test_spending_counts_down_and_ignores_negative_times():
    budget = ExtractionBudget(10, spent_seconds=1.5)
    budget.spend(3)
    budget.spend(-2)  # a clock that went backwards spends nothing
    assert budget.remaining() == 5.5 and budget.spent_seconds == 4.5
    budget.spend(6)
    assert budget.remaining() < 0


def test_page_tasks_in_threads_spend_from_one_total():
    budget = ExtractionBudget(1000)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: [budget.spend(0.25) for _ in range(100)], range(8)))
    assert budget.spent_seconds == 200
