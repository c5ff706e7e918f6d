"""Runtime pieces shared by the build and serving sides: the build->serve contract."""
