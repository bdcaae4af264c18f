"""flowcni.controller"""
