# Asked with `make -C $OPENSIPS_SRC -f .../tree.mk TARGET`: what the OpenSIPS
# tree's own build knows, read the way its top-level Makefile reads it
# (Makefile.conf, or the template `make` copies from, then Makefile.defs).

include $(if $(wildcard Makefile.conf),Makefile.conf,Makefile.conf.template)
include Makefile.defs

# the compiler flags and definitions the tree's modules are built with, one
# argument a line (the shell removes make's quoting, as for the compiler)
evv-print-flags:
	@printf '%s\n' $(MOD_CFLAGS) $(DEFS)

# where `make install` puts that tree's modules
evv-modules-dir:
	@echo $(modules_prefix)/$(modules_dir)
