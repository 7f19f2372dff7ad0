"""placeholder while the core is brought up"""
