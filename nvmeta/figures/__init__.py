"""Figures and the analysis overview page."""
