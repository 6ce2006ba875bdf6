"""The evaluation stage: score cached regions, write detections, compute LVIS / COCO metrics."""
