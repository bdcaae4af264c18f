"""flowcni.lab"""
