"""Every attention backend name the config accepts (kept free of torch imports for config.py).

Which of them are installed is decided at run time by backends.py; `auto` is resolved there.
"""
EXACT_BACKENDS = ("sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math",
                  "flash_attn", "flash_attn4", "flash_attn3", "flash_attn2")
LOSSY_BACKENDS = ("sage",)
BACKEND_CHOICES = ("auto",) + EXACT_BACKENDS + LOSSY_BACKENDS
