/* Binds a process's wildcard listeners to one address: an LD_PRELOAD library.
 *
 * Reverb's and Courier's servers listen on "[::]:<port>" (every interface),
 * with no option to choose. Preloaded (launch/network.py builds it with the
 * system's cc), this bind() takes a bind to the wildcard address (0.0.0.0 or
 * ::) to $PLASTICITY_BIND_ADDRESS (an IPv4 or IPv6 literal) instead; every
 * other bind is left as asked. Without that variable it changes nothing.
 *   - IPv4 socket: the IPv4 address (an IPv6 loopback target: 127.0.0.1).
 *   - IPv6 dual-stack socket: the IPv6 address, or the IPv4 one mapped
 *     (::ffff:a.b.c.d), which takes the IPv4 connections to it.
 *   - IPv6-only socket and an IPv4 target: ::1 if the target is a loopback
 *     address.
 * A socket that cannot take the target fails with EADDRNOTAVAIL: gRPC then
 * listens on its other socket, the one that can.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
  static bind_fn real_bind;
  if (!real_bind) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
  const char *target = getenv("PLASTICITY_BIND_ADDRESS");
  if (!target || !*target || !addr) return real_bind(fd, addr, len);
  struct in_addr v4;
  struct in6_addr v6;
  int is_v4 = inet_pton(AF_INET, target, &v4) == 1;
  int is_v6 = !is_v4 && inet_pton(AF_INET6, target, &v6) == 1;
  int loopback = (is_v4 && (ntohl(v4.s_addr) >> 24) == 127) || (is_v6 && IN6_IS_ADDR_LOOPBACK(&v6));
  if (addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
    struct sockaddr_in out;
    memcpy(&out, addr, sizeof out);
    if (out.sin_addr.s_addr != htonl(INADDR_ANY)) return real_bind(fd, addr, len);
    if (is_v4) out.sin_addr = v4;
    else if (loopback) out.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    else { errno = EADDRNOTAVAIL; return -1; }
    return real_bind(fd, (const struct sockaddr *)&out, sizeof out);
  }
  if (addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
    struct sockaddr_in6 out;
    memcpy(&out, addr, sizeof out);
    if (!IN6_IS_ADDR_UNSPECIFIED(&out.sin6_addr)) return real_bind(fd, addr, len);
    int v6only = 0;
    socklen_t size = sizeof v6only;
    if (getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &size) != 0) v6only = 0;
    if (is_v6) out.sin6_addr = v6;
    else if (is_v4 && !v6only) {
      memset(&out.sin6_addr, 0, sizeof out.sin6_addr);
      out.sin6_addr.s6_addr[10] = out.sin6_addr.s6_addr[11] = 0xff;
      memcpy(&out.sin6_addr.s6_addr[12], &v4, sizeof v4);
    } else if (loopback) out.sin6_addr = in6addr_loopback;
    else { errno = EADDRNOTAVAIL; return -1; }
    return real_bind(fd, (const struct sockaddr *)&out, sizeof out);
  }
  return real_bind(fd, addr, len);
}
