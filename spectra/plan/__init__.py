"""Planning (layer 3): the plan format, editing rows, candidates, allocation, auto-plans,
sensitivities."""
