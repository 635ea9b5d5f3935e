"""The stages of one compression job; `compression.job.run_job` runs them in order.

Each stage calls the method's `MethodSpec` (see `compression.methods.spec`) and special-cases no method.
"""
