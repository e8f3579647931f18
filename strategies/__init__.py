"""Predictors: one file per caching/forecasting method."""
