"""In-pod mode: each pod's listener set bound inside its netns (sockets.py), supervised in one nursery per pod
(proxies.py), started and stopped by the ZDS client through InPodWorkloadHandler (handler.py)."""
