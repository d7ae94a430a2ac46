/* Declarations of Blazil AI's native layer over aeronc.h. build_binding.py feeds the part between the
 * CDEF markers to cffi, which checks it against this header when it compiles the module. */
#ifndef BLAZIL_AERON_H
#define BLAZIL_AERON_H

#include <stddef.h>
#include <stdint.h>

#include "aeronc.h"

/* CDEF-BEGIN */
#define BLZ_DRIVER_GONE -100
#define BLZ_POLL_ERROR -101
#define BLZ_NO_MEMORY -102

typedef struct blz_client_stct blz_client_t;
typedef struct blz_pub_stct blz_pub_t;
typedef struct blz_sub_stct blz_sub_t;

typedef struct blz_msg_stct
{
    uint8_t *data;
    uint64_t len;
    uint64_t offset;
    int32_t session_id;
    int32_t owned;
}
blz_msg_t;

const char *blz_aeron_version(void);
blz_client_t *blz_client_open(const char *dir, int64_t driver_timeout_ms, char *err, size_t errlen);
void blz_client_close(blz_client_t *c);
int blz_client_check(blz_client_t *c);
int blz_client_last_error(blz_client_t *c, char *buf, size_t len);
int64_t blz_client_driver_pid(blz_client_t *c);

blz_pub_t *blz_pub_open(blz_client_t *c, const char *channel, int32_t stream_id, int64_t timeout_ms,
    char *err, size_t errlen);
void blz_pub_close(blz_pub_t *p);
int blz_pub_is_connected(blz_pub_t *p);
int64_t blz_pub_max_message(blz_pub_t *p);
int32_t blz_pub_session_id(blz_pub_t *p);
int64_t blz_pub_offerv(blz_pub_t *p, aeron_iovec_t *iov, size_t n, int64_t timeout_ms, int wait_connect);
int blz_pub_set_doorbell(blz_pub_t *p, const char *path);
int64_t blz_pub_offer_bytes(blz_pub_t *p, const char *buf, size_t len, int64_t timeout_ms, int wait_connect);
int64_t blz_pub_offer_many(blz_pub_t *p, const uint8_t *buf, const uint64_t *lens, size_t n, int64_t timeout_ms,
    int wait_connect, size_t *accepted);

blz_sub_t *blz_sub_open(blz_client_t *c, const char *channel, int32_t stream_id, uint64_t max_size,
    int64_t timeout_ms, char *err, size_t errlen);
void blz_sub_close(blz_sub_t *s);
int blz_sub_poll(blz_sub_t *s, int fragment_limit);
int blz_sub_set_doorbell(blz_sub_t *s, const char *path);
int blz_sub_wait(blz_sub_t *s, int fragment_limit, int64_t timeout_ms);
blz_msg_t *blz_sub_messages(blz_sub_t *s);
uint64_t blz_sub_batch_bytes(blz_sub_t *s);
void blz_sub_copy_batch(blz_sub_t *s, uint8_t *out, uint64_t *lens);
uint64_t blz_sub_dropped(blz_sub_t *s);
int blz_sub_is_connected(blz_sub_t *s);
int blz_sub_image_count(blz_sub_t *s);
/* CDEF-END */

#endif
