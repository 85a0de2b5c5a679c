"""The Open Inference Protocol (KServe v2) front ends; the public API is fleet.oip."""
