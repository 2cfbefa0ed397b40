#!/bin/bash
# Cheap container health probe (the image's HEALTHCHECK, /usr/local/bin/mvc-healthz): GET /healthz
# on this container's metrics port over bash's /dev/tcp. No Python start-up and no library import
# per check (`remote-mvc-ctl health` costs a whole interpreter every few seconds in every
# container; bench/health_probe_cpu.py measures the difference). Exit 0 on HTTP 200, else 1.
#   MVC_METRICS_PORT  the port (default 9100);   HEALTHZ_TIMEOUT  seconds to wait for the reply (default 5;
#   not MVC_*: the services refuse unknown MVC_ settings, and the probe shares their environment)
exec 3<>"/dev/tcp/127.0.0.1/${MVC_METRICS_PORT:-9100}" 2>/dev/null || { echo "unavailable: no answer on port ${MVC_METRICS_PORT:-9100}"; exit 1; }
printf 'GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
IFS=' ' read -r -t "${HEALTHZ_TIMEOUT:-5}" _proto status _rest <&3 || { echo "unhealthy: no reply"; exit 1; }
exec 3<&-
if [ "$status" = 200 ]; then echo ok; exit 0; fi
echo "unhealthy: HTTP $status"
exit 1
