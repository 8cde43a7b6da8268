"""Refusal-direction repair (docs/repair.md): the linear algebra, the residual-stream plumbing, the selection
and the step."""
