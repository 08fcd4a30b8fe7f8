"""Pure logic of the operator: phases, conditions, naming, estimate. No I/O in here."""
