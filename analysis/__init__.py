"""Collapse analysis reports and the scaling study (the last stage of the data flow)."""
