"""Parallel-layout planner (issue 19): traffic, memory and step-time models of a megamoe layout."""
