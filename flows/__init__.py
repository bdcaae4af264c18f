"""flowcni.flows"""
