"""flowcni.ovsdb"""
