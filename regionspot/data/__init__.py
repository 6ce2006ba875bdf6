"""Dataset readers (-> ImageRecord), proposals files and the procedural toy dataset."""
