"""The recipe search (docs/search.md): the space and settings (torch-free), recipes, matched-safety comparisons,
the runner and its report."""
