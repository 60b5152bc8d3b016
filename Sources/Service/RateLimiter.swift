// RateLimiter: at most `limit` events per key within a sliding window, in
// this process (used for on-demand audits per user per minute). Keys with
// no event inside the window are forgotten, so it holds at most the keys
// active in the last window.
import Foundation
import Synchronization

final class RateLimiter: Sendable {
    let limit: Int
    let window: Double
    private let events = Mutex<[Int64: [Date]]>([:])

    init(limit: Int, window: Double) {
        self.limit = limit
        self.window = window
    }

    /// Records an event for `key` and returns nil, or, when `limit` events
    /// already lie within the window, records nothing and returns the
    /// seconds until the oldest of them leaves it.
    func admit(_ key: Int64, now: Date = Date()) -> Double? {
        events.withLock { events in
            let since = now.addingTimeInterval(-window)
            if events.count > 10_000 { events = events.filter { $0.value.contains { $0 > since } } }
            var recent = (events[key] ?? []).filter { $0 > since }
            if recent.count >= limit {
                events[key] = recent
                return recent[0].timeIntervalSince(since)
            }
            recent.append(now)
            events[key] = recent
            return nil
        }
    }
}
