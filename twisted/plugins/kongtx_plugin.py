from twisted.application.service import ServiceMaker

kongtx = ServiceMaker(
    "kongtx",
    "kongtx.tap",
    "Kong-compatible API gateway: proxy and Admin API",
    "kongtx",
)
