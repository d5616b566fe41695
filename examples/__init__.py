"""Examples of pdserve's plug-in points, small enough to copy: `queue_scaler`, a fleet-scaling policy."""
