"""flowcni.cni"""
