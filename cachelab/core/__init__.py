"""The caching mechanism: predictors, schedules, sites, the controller. Imports only torch and the standard library."""
