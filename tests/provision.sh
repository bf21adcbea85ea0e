#!/usr/bin/env bash
# Builds the OpenSIPS releases the module is tested against, from their
# release archives, into a cache inside the checkout (one folder a version),
# the way `cargo pgrx init` builds the PostgreSQL versions pgrx supports.
#
#   tests/provision.sh CACHE VERSION...
#
# CACHE/VERSION/ is a built source tree: the core and exactly the modules in
# MODULES below.  CACHE/archives/ keeps each release archive (the test that
# builds the module against an unbuilt source extracts it again).
#
# Archives come from the folder OPENSIPS_ARCHIVES names, when set (files
# opensips-<version>.tar.gz, top folder opensips-<version>/; a SHA256SUMS
# file beside them is checked), else from the release tag on GitHub.
#
# A tree is built aside and moved into place only when complete, with a
# stamp that names the modules built; a run that finds the stamp of the same
# recipe does nothing.  Any failure stops with one line that says what to do.
set -euo pipefail

SUPPORTED="3.4.18 3.6.8 4.0.1"
# what the tests, the bench and the demo load, and the C event_virtual the
# bench compares with; the virtual module's own build needs none of them
# (clusterer and proto_bin: the two-node tests; event_route: the status
# event's example, a module of its own before 3.6 and core after)
MODULES="clusterer event_datagram event_flatstore event_stream event_rabbitmq
event_virtual mi_datagram mi_fifo proto_bin sl signaling tm"
MODULES=$(echo $MODULES)
# bump when the way a tree is built changes, so older trees get rebuilt
RECIPE=2

die() { echo "error: $*" >&2; exit 1; }

[ $# -ge 2 ] || die "usage: $0 CACHE VERSION..."
cache=$1
shift
for v in "$@"; do
	case " $SUPPORTED " in
	*" $v "*) ;;
	*) die "OpenSIPS $v is not supported: set OPENSIPS_VERSION to one of $SUPPORTED" ;;
	esac
done

# the build tools and libraries the trees need, each with its Debian package
need=()
for t in cc:gcc make:make bison:bison flex:flex tar:tar gzip:gzip sha256sum:coreutils; do
	command -v "${t%%:*}" >/dev/null || need+=("${t#*:}")
done
# event_rabbitmq links librabbitmq
[ -e /usr/include/amqp.h ] || [ -e /usr/include/rabbitmq-c/amqp.h ] || need+=(librabbitmq-dev)
if [ ${#need[@]} -gt 0 ]; then
	die "building OpenSIPS needs: apt-get install ${need[*]}"
fi

mkdir -p "$cache/archives"
cache=$(cd "$cache" && pwd)
# one provisioning at a time per cache: a second `make test` waits
exec 9>"$cache/.lock"
flock 9

stamp_text() { echo "recipe=$RECIPE modules=$MODULES"; }

check_archive() { # file version: a whole gzip tar of that release's tree
	gzip -t "$1" 2>/dev/null ||
		{ echo "error: $1 is corrupt (not a whole gzip file): replace it and run again" >&2; return 1; }
	local top
	top=$(tar tzf "$1" | head -n1)
	[ "${top%%/*}" = "opensips-$2" ] ||
		{ echo "error: $1 holds ${top%%/*}/, not opensips-$2/: it is not that release's archive" >&2; return 1; }
}

fetch_archive() { # version -> path of a verified archive in the cache
	local v=$1 name="opensips-$1.tar.gz" dest="$cache/archives/opensips-$1.tar.gz"
	if [ -n "${OPENSIPS_ARCHIVES:-}" ]; then
		local src="$OPENSIPS_ARCHIVES/$name"
		[ -f "$src" ] || die "no $name in OPENSIPS_ARCHIVES=$OPENSIPS_ARCHIVES: put the release archive there, or unset OPENSIPS_ARCHIVES to download it"
		if [ -f "$OPENSIPS_ARCHIVES/SHA256SUMS" ] && grep -q " \*\?$name\$" "$OPENSIPS_ARCHIVES/SHA256SUMS"; then
			(cd "$OPENSIPS_ARCHIVES" && grep " \*\?$name\$" SHA256SUMS | sha256sum -c --status) ||
				die "$src does not match its SHA256SUMS: replace the archive"
		fi
		check_archive "$src" "$v" || exit 1
		if ! cmp -s "$src" "$dest"; then
			cp "$src" "$dest.part" && mv "$dest.part" "$dest"
		fi
	elif [ ! -f "$dest" ]; then
		local url="https://github.com/OpenSIPS/opensips/archive/refs/tags/$v.tar.gz"
		command -v curl >/dev/null || die "no OPENSIPS_ARCHIVES and no curl to download $url: set OPENSIPS_ARCHIVES to a folder with $name"
		echo "downloading $url" >&2
		curl -fsL --connect-timeout 15 --max-time 600 -o "$dest.part" "$url" ||
			{ rm -f "$dest.part"; die "cannot download $url: set OPENSIPS_ARCHIVES to a folder with $name"; }
		mv "$dest.part" "$dest"
	fi
	check_archive "$dest" "$v" || { rm -f "$dest"; exit 1; }
	echo "$dest"
}

provision() {
	local v=$1 tree="$cache/$1"
	if [ -f "$tree/.evv-provisioned" ] && [ "$(cat "$tree/.evv-provisioned")" = "$(stamp_text)" ]; then
		echo "OpenSIPS $v: ready in $tree"
		return
	fi
	local archive
	archive=$(fetch_archive "$v")
	local aside="$cache/.build-$v" log="$cache/build-$v.log"
	rm -rf "$aside"
	mkdir -p "$aside"
	# a failed or interrupted build leaves nothing a later run could take
	# for a tree: the aside folder goes, and the stamp is written last
	trap 'rm -rf "$aside"' EXIT
	trap 'exit 130' INT TERM HUP
	echo "OpenSIPS $v: building the core and the modules the tests load (log: $log)"
	local start=$SECONDS jobs
	jobs=$(nproc 2>/dev/null || echo 2)
	tar xzf "$archive" -C "$aside"
	local modules=$MODULES
	[ -d "$aside/opensips-$v/modules/event_route" ] && modules="$modules event_route"
	if ! (cd "$aside/opensips-$v" &&
		make -j"$jobs" app &&
		make -j"$jobs" modules module="$modules") >"$log" 2>&1; then
		tail -n 15 "$log" >&2
		die "building OpenSIPS $v failed: see $log"
	fi
	for m in $modules; do
		[ -f "$aside/opensips-$v/modules/$m/$m.so" ] || die "building OpenSIPS $v did not produce $m.so: see $log"
	done
	stamp_text >"$aside/opensips-$v/.evv-provisioned"
	rm -rf "$tree"
	mv "$aside/opensips-$v" "$tree"
	rm -rf "$aside"
	trap - EXIT
	echo "OpenSIPS $v: built in $((SECONDS - start)) s into $tree"
}

for v in "$@"; do
	provision "$v"
done
